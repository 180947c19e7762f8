//! Hardening, clients: slow, silent, crowding and numerous clients.
