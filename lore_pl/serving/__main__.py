"""``python -m lore_pl.serving --run RUN``: the reward server (as ``lore-pl serve``)."""

from lore_pl.serving.server import main

if __name__ == "__main__":
    main()
