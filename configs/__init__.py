"""Example configurations, installed as package data (``lmc_transfer.configs``)."""
