"""``python -m services.router``"""

import sys

from services.router.service import RouterService

sys.exit(RouterService.main())
