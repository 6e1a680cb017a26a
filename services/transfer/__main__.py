"""``python -m services.transfer``"""

import sys

from services.transfer.service import TransferService

sys.exit(TransferService.main())
