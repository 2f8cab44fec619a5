"""An example third-party adapter plugin: legacy flat files dropped into a folder."""

from gateway_dropfolder.source import DropFolderConfig, DropFolderSource

__all__ = ["DropFolderConfig", "DropFolderSource"]
