"""`synthalign make-tiny`: tiny random-weight models and the pretrained shapes-world LLaVA."""
