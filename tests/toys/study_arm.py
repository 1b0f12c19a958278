"""A toy study arm for the registry test: one module and one registration.

``targeted_top1`` trains targeted LoRA on the KL circuit's first layer only.
"""

from __future__ import annotations

from sumcircuit.study import Arm, Variant, register_arm


def register() -> Arm:
    return register_arm(Arm("targeted_top1", "targeted-lora", "targeted", "targeted (top layer)",
                            lambda ctx: [Variant("targeted_top1", {"layers": tuple(ctx.kl_layers[:1])})],
                            needs=("circuit",)), replace=True)
