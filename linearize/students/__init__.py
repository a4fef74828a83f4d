"""Students: the attention modules that replace softmax attention. ``STUDENTS`` maps the names
recipes use to their classes."""

from .base import MODES, Student, TransferRecord, key_padding_mask, repeat_kv
from .hedgehog import HedgehogConfig, HedgehogStudent
from .lawcat import LawcatConfig, LawcatState, LawcatStudent
from .lolcats import LolcatsConfig, LolcatsStudent
from .still import StillConfig, StillStudent

STUDENTS: dict[str, type[Student]] = {cls.kind: cls for cls in (HedgehogStudent, LolcatsStudent, LawcatStudent, StillStudent)}

__all__ = [
    "MODES",
    "STUDENTS",
    "Student",
    "TransferRecord",
    "HedgehogConfig",
    "HedgehogStudent",
    "LawcatConfig",
    "LawcatState",
    "LawcatStudent",
    "LolcatsConfig",
    "LolcatsStudent",
    "StillConfig",
    "StillStudent",
    "key_padding_mask",
    "repeat_kv",
]
