//! The soft backend: one-sided operations over TCP.
