//! Contracts between the mesh's processes: gRPC services, workload identities, the local
//! placement file. Wire types are converted to domain types once, at the edge that receives them.
pub mod crd;
pub mod gateway;
pub mod identity;
pub mod pair;
pub mod placement;
pub mod sync;

/// The certificate service (`proto/mesh/ca/v1/ca.proto`).
pub mod ca {
    pub mod v1 {
        tonic::include_proto!("mesh.ca.v1");
    }
}

/// Config distribution (`proto/mesh/config/v1/config.proto`).
pub mod config {
    pub mod v1 {
        tonic::include_proto!("mesh.config.v1");
    }
}

/// Metadata keys of node credentials on gRPC calls.
pub mod auth {
    /// The calling node's name.
    pub const NODE_HEADER: &str = "x-mesh-node";
    /// `Bearer <token>`.
    pub const AUTHORIZATION: &str = "authorization";
}
