"""Names and numbers shared by the Stage 2 model and its batch builders (LLaVA's ``constants.py``)."""

IGNORE_INDEX = -100  # label of positions without a loss (fMRI tokens, prompts, padding); PyTorch's default
FMRI_START = "<fmri>"  # delimiter token before the fMRI block (added to the LLM tokenizer as a special token)
FMRI_END = "</fmri>"  # delimiter token after the fMRI block
DELIMITERS = (FMRI_START, FMRI_END)
