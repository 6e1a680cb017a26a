"""``python -m services.executor``"""

import sys

from services.executor.service import ExecutorService

sys.exit(ExecutorService.main())
