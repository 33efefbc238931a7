def dice_ce_loss(*args, **kwargs):
    raise NotImplementedError("placeholder")


def roi_bce_loss(*args, **kwargs):
    raise NotImplementedError("placeholder")
