"""``python -m infobatch_stream ...``: the ``infobatch-stream`` command.

    python -m infobatch_stream inspect ./scores --json
"""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
