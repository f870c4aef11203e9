"""``python -m normswap.training OUT --teacher SRC ...``: the ``normswap finetune`` command, launchable by accelerate.

``accelerate launch -m normswap.training OUT --teacher SRC --recipe recipes/NAME.yaml --text-file F -o HEALED`` runs
the same recipe on every process; only the main process writes the output.
"""

import sys

from normswap.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
