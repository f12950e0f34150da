"""Model card templates (Jinja, rendered by ``vqlib.cards`` with huggingface_hub's ``ModelCard.from_template``).

Installed as the package ``vqlib.model_cards`` so an installed wheel reads them with ``importlib.resources``."""
