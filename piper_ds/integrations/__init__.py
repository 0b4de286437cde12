"""Bridges to other model libraries; each lives in its own subpackage and is imported only when used."""
