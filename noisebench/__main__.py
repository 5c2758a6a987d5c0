"""``python -m noisebench``: the ``noisebench`` command (train, evaluate, record, leaderboard)."""
from noisebench.cli import main

if __name__ == "__main__":
    main()
