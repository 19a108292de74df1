"""``python -m ptame.figures``: images x checkpoints explanation grids (the paper's Fig. 6, 7);
see :mod:`ptame.analysis.figures`."""

from ptame.analysis.figures import main

if __name__ == "__main__":
    main()
