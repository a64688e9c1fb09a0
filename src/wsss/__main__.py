"""`python -m wsss` (and `torchrun -m wsss train ...`). Guarded: spawned workers re-import __main__."""

if __name__ == "__main__":
    from wsss.cli import main

    main()
