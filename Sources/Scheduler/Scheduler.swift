// Placeholder; replaced by the JobScheduler implementation.
