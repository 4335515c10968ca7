"""What every layer relies on and nothing above it: paths local or gs://, run logs, workdir locks, multi-host
start-up, config files and the errors a user causes."""
