"""History checkers for the fault-injection suite, one module per property.

Each returns a `Verdict`; print it to see the minimal offending sub-history.
"""

from tests.fault.checkers.cache_monotonic import check_cache_monotonic
from tests.fault.checkers.convergence import check_converged
from tests.fault.checkers.durability import check_no_lost_or_duplicated
from tests.fault.checkers.linearizability import check_linearizable
from tests.fault.checkers.verdict import Verdict

__all__ = ["Verdict", "check_cache_monotonic", "check_converged", "check_linearizable",
           "check_no_lost_or_duplicated"]
