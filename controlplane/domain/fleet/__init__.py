"""The fleet: nodes and their registration, labels and liveness (`nodes`), heartbeats and
status reports committed in groups (`heartbeats`, `group_commit`), and operators'
direct assignments with the rollouts' safety checks (`assignments`)."""
