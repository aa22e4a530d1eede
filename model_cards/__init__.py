"""Model card templates (Jinja, rendered by huggingface_hub's ModelCard API); shipped as gradiend_hf.model_cards."""
