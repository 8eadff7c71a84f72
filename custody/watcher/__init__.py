"""The deposit watcher: the one process that follows the chain for the service (deposits,
spends, reorgs) and tells loans and signing what happened."""
