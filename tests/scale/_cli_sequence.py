"""Run several ``recalign`` commands one after another in one process.

``accelerate launch tests/scale/_cli_sequence.py '[["sft", ...], ["align", ...]]'`` runs each argument
list through :func:`recalign.cli.main.main`, exactly as ``recalign sft ...`` would, but pays for
interpreter start-up, imports and the process-group rendezvous once instead of once per command
(on a busy 2-core machine that start-up is most of a multi-process test's time).
"""

import json
import sys

from recalign.cli.main import main

if __name__ == "__main__":
    for argv in json.loads(sys.argv[1]):
        code = main(argv)
        if code:
            sys.exit(code)
