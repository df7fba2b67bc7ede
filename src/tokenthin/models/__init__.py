"""Real pretrained models tokenthin can load offline."""
