"""Thin adapters from training frameworks to AdapterExportHook."""
