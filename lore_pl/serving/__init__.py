"""The reward server (``lore-pl serve``): a run's personal rewards over HTTP on LitServe, with OpenRLHF's
``POST /get_reward``, a native ``POST /score`` (reward and ``score_std`` per row), and journaled user
updates (``/personalize``, ``/observe``, ``/forget``). See docs/guide.md, "The reward server"."""
