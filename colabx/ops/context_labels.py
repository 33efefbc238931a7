def context_labels(*args, **kwargs):
    raise NotImplementedError("placeholder")
