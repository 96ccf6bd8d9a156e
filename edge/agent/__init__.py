"""The device agent for devices that run the packaged container: what lets the runtime image itself be updated
(work in progress: the switchable TCP front so far; pulling, starting and checking containers come next)."""
