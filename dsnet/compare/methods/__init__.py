"""The methods of ``dsnet compare``, one module each; importing a module registers its methods.

To add a method: write a module here with a :class:`dsnet.compare.core.Method`
subclass decorated with :func:`dsnet.compare.core.register_method`, and import
it below.
"""

from dsnet.compare.methods import alone, dynamic, lcnet, pss, usnet  # noqa: F401

DEFAULT_ORDER = (
    "dsnet",
    "static",
    "cascade",
    "usnet",
    "alone",
    "lcnet",
    "pss",
    "pss_gate",
    "pss_uniform",
    "pss_uniform_gate",
)
