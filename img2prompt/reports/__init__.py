"""Reports: the study's figures (``plots``), the numbered notebooks run with papermill and
exported to HTML (``notebooks``), and the setup every notebook calls (``notebook``)."""
