"""A legacy SOAP service simulator for tests and the demo (real HTTP, standard library only)."""

from tests.soapsim.server import T0, WSDL_PATH, XSD_PATH, Order, SoapSimulator

__all__ = ["Order", "SoapSimulator", "T0", "WSDL_PATH", "XSD_PATH"]
