"""The web console: server-rendered pages over the domain services, signed in with passkeys."""
