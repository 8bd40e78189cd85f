"""Enforcement backends: they turn the policy's limits into real egress caps."""
