"""``python -m services.model_store``"""

import sys

from services.model_store.service import ModelStoreService

sys.exit(ModelStoreService.main())
