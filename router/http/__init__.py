"""The HTTP surface: the fast lane, thin routes, request parsing, the stream writer.

Nothing is imported here: routing/ uses the stream writer and the body reader, and a
package init that pulled in the routes (which import routing/) made `import
router.routing.gateway` fail on a cycle when it came first.
"""
