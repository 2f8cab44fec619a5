"""A legacy SOAP order service simulator, served over real HTTP (tests, the demo, benchmarks)."""

from adapters.soap.simulator.server import T0, WSDL_PATH, XSD_PATH, Order, SoapSimulator

__all__ = ["T0", "WSDL_PATH", "XSD_PATH", "Order", "SoapSimulator"]
