"""Every state change of the training domain goes through one of these modules.

Import from the module (``from downpour.training.actions.jobs import submit_job``): there
are no re-exports here, as in Zulip's ``zerver/actions``.
"""
