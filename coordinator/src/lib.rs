//! The control plane: accepts jobs, keeps cluster state in a store (etcd or in-memory), places
//! ranks, watches liveness. Never links model or kernel code.
