"""Bridges to other libraries' models.

``memory_ext.integrations.transformers`` puts memory layers into Hugging Face causal LMs
(``add_memory``), saves and reloads them (``save_pretrained`` / ``from_pretrained``) and
trains them under ``transformers.Trainer`` (``memory_ext.integrations.trainer``). The
submodules import ``transformers`` themselves, so importing this package needs nothing
beyond memory_ext.
"""

__all__: list[str] = []
