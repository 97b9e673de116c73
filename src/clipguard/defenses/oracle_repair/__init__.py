"""Oracle-guided repair: find trigger regions in an unlabelled pool and fine-tune them away.

config.py holds the settings; oracle.py the segmentation oracles (region proposals);
trigger_search.py Algorithm 1 (which regions act as a trigger); repair.py Algorithm 2 (victim
labels), the compact set, the fine-tune and the outputs.
"""

from clipguard.defenses.oracle_repair.config import OracleRepairConfig
from clipguard.defenses.oracle_repair.defense import OracleRepair
from clipguard.defenses.oracle_repair.repair import (
    NO_TRIGGER, RepairPairs, build_compact_set, expand_victims, oracle_repair, repair_finetune, report_summary,
    save_repaired_model, victim_labels, write_repair_report,
)

__all__ = ["NO_TRIGGER", "OracleRepair", "OracleRepairConfig", "RepairPairs", "build_compact_set", "expand_victims", "oracle_repair",
           "repair_finetune", "report_summary", "save_repaired_model", "victim_labels", "write_repair_report"]
