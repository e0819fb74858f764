"""The pretrained language model side of fMRI-LM: backbone loading, text features and English text."""
