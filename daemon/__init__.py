"""vfsd, the daemon that mounts the store under /pfs (arrives with the FUSE work)."""
