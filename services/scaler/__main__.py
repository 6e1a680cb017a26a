"""``python -m services.scaler``"""

import sys

from services.scaler.service import ScalerService

sys.exit(ScalerService.main())
