"""Selection reads a held-out slice of the training images by default, never the reported split."""

import torch

from dsnet.data import build_dataset


def test_a_recipe_without_a_holdout_still_selects_on_held_out_images():
    """data.holdout unset (null): 10% of the training images are held out, and selection reads them, not val."""
    from dsnet.train.config import load_config
    from dsnet.train.run import selection_loader

    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic.num_train=200", "data.synthetic.num_val=40"])
    assert cfg["data"]["holdout"] is None
    train, _ = build_dataset(cfg["data"], "train")
    hold, _ = build_dataset(cfg["data"], "holdout")
    assert (len(train), len(hold)) == (180, 20)
    loader, split = selection_loader(cfg["data"], 0, torch.device("cpu"))
    assert split == "holdout" and len(loader.dataset) == 20
    _, split = selection_loader({**cfg["data"], "holdout": 0}, 0, torch.device("cpu"))
    assert split == "val"  # only when the user turns the held-out slice off
