"""Issue 7: crash, fault and hostile-input tests (CI-sized here; scripts/reliability runs them big)."""
