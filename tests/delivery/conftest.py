from tests.delivery.faults import fault_proxy  # noqa: F401  (fixture)
from tests.servers import sidecar  # noqa: F401  (fixture)
