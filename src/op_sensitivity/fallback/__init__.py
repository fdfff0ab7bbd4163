"""From spectrum to decision: the policy that picks ops (``policy``), the canonical keep-list
document (``keep_list``) and its per-quantizer exports (``exports``)."""
