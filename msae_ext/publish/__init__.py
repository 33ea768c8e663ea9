"""Publishing: Hub releases in sae-lens format, the release registry, the authors' checkpoints.

    hub.py       `msae publish`: SAE folders -> repository tree + model card -> upload
    registry.py  hf_hub/pretrained_saes.yaml registered with sae-lens (loaders 'msae_authors', 'msae_ext');
                 msae_ext.SAE.from_pretrained; a release's concept names; open_sae (folder or release)
    authors.py   the authors' .pth checkpoints -> our SAE; their concept-interpreter matrices
"""

from .authors import (
    AuthorsCheckpointError,
    convert_authors_checkpoint,
    load_authors_sae,
    parse_authors_name,
    read_concept_matrix,
)
from .hub import PublishError, model_card, publish, stage_release
from .registry import (
    SAE,
    ReleaseUnavailableError,
    default_sae_id,
    load_registry,
    open_sae,
    register_releases,
    release_concepts,
)

__all__ = ["SAE", "AuthorsCheckpointError", "PublishError", "ReleaseUnavailableError", "convert_authors_checkpoint",
           "default_sae_id", "load_authors_sae", "load_registry", "model_card", "open_sae", "parse_authors_name",
           "publish", "read_concept_matrix", "register_releases", "release_concepts", "stage_release"]
