"""The device agent for devices that run the packaged container: what lets the runtime image itself be updated
(in progress: the Engine API client and the switchable TCP front so far; the update procedure that pulls,
starts, checks and switches comes next)."""
